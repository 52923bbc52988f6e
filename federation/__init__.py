"""What the client and the server share, and nothing else: neither imports the other.

- `federation.protocol`: the messages between them (train and evaluate, instruction and reply)
  as dataclasses, their Flower record keys defined once, and the one place a reply is parsed;
- `federation.validation`: every check of what a client sends (pure numpy, no Flower);
- `federation.records`: Flower records <-> the wire format's plain numpy arrays;
- `federation.processes` and `federation.addresses`: starting and watching Flower processes,
  and HOST:PORT parsing and probing (TLS included), for the `python -m server` / `python -m
  client` wrappers; `federation.credentials`: their certificates and device keys.

It may import edgecore and flwr, never client, server or simulations.
"""
