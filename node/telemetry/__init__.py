"""What the node tells its operators: metrics (Prometheus) and logging set-up."""
