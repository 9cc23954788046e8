"""The development harness: embedded servers, the simulated farm, the local stack,
the role processes it runs and the demo. The service itself does not import it."""
