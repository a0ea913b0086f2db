"""`python -m benchmarks.latency`: the report script behind `altermoma.bench` (kept so recorded commands still run)."""

from altermoma.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
