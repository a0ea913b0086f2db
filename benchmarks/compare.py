"""`python -m benchmarks.compare`: the report script behind `altermoma.compare` (kept so recorded commands still run)."""

from altermoma.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
