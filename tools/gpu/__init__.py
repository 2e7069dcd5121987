"""GPU machine checks: ``gpu-check.sh`` (install, CUDA tests, benchmarks) and the device probes it runs."""
