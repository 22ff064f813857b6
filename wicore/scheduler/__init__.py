"""Request scheduling: queues, batching, admission, preemption, load balancing."""
