"""`python -m benchmarks.flops`: the report script behind `altermoma.flops` (kept so recorded commands still run)."""

from altermoma.flops import main

if __name__ == "__main__":
    raise SystemExit(main())
