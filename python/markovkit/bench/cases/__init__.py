"""Benchmark cases, one module per op family; each module registers its cases with `@cases(family)`."""
