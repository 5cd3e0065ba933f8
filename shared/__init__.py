"""GenFL: code shared by the server and the clients (models, data, codec, protocol stubs)."""
