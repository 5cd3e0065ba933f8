"""GenFL client: a task executor that holds one data shard."""
