"""Connections: sockets, framed channels, TLS."""
