"""GenFL aggregation server."""
