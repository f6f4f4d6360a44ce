"""The service layer: the network server around the library (WebSocket + REST protocol of the hosted API, task
registry, capacity, outbound-call policy). The library never imports this package."""
