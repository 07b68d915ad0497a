"""The only code that imports pynetdicom: server, receive path, handlers, statuses."""
