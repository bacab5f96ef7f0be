"""vLLM hooks: the config hook, scheduler, admission checks, the worker step and the platform
workers and runners that run it, the KV cache reads, the counters sent to /metrics, and the
workers' RPCs (stats, a pass timed on the device)."""
