"""The sandbox server: slots, tools, isolation and the HTTP API."""
