"""Between the server and the runtime: queues, worker threads, and the order requests run in."""
