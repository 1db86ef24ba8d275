"""Capacity planning (`bedside plan`): measure the repository's models, pack their instances into
boxes by memory, and simulate the box's queues under a workload to predict queue delay per priority.
Not serving code: nothing the server runs imports it."""
