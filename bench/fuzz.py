"""The fuzz tests with many more cases: the decoder's properties (tests/data/test_decode_fuzz.py)
and the server against its OpenAPI schema (tests/serve/test_schema.py), same code, bigger budget.

    python bench/fuzz.py [--cases 20000] [--api-cases 2000] [--seed 0]

Prints, per property, the cases run, how many passed and how long it took; a failing case is
printed by hypothesis with the seed that reproduces it, and the exit status is then 1. The run is
seeded (--seed), so a failure can be replayed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "data"), str(ROOT / "tests" / "serve")]

import test_decode_fuzz as decode  # noqa: E402  (the tests' properties and strategies)
import test_schema as api  # noqa: E402
from serve_helpers import running_server, train_stripes_run  # noqa: E402

BUDGET = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_property(name: str, strategy, prop, cases: int, rng_seed: int) -> bool:
    """Run `prop(case)` on `cases` examples of `strategy`; prints one line; True when all passed."""
    counted = {"n": 0}

    def counted_prop(case):
        counted["n"] += 1
        prop(case)

    test = seed(rng_seed)(settings(max_examples=cases, **BUDGET)(given(case=strategy)(counted_prop)))
    start = time.perf_counter()
    try:
        test()
        ok = True
    except Exception as err:  # noqa: BLE001 - hypothesis has printed the falsifying case
        print(f"  FAILED: {type(err).__name__}: {str(err)[:500]}")
        ok = False
    seconds = time.perf_counter() - start
    print(f"{name:58s} {counted['n']:>7,} cases  {'all passed' if ok else 'FAILED':10s}  {seconds:7.1f} s", flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20_000, help="damaged or forged files for the decoder property")
    parser.add_argument("--api-cases", type=int, default=2_000, help="requests per schemathesis generation mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    decode.decoder_loaded.__wrapped__()  # the tests' warm-up, so memory per case counts only the case
    real, fuzzed = decode.real_files, decode.fuzzed_files
    results = [
        run_property("decoder: damaged/forged files (no crash, memory bound)", fuzzed(),
                     decode.test_damaged_and_forged_files_never_crash_or_blow_memory.hypothesis.inner_test,
                     args.cases, args.seed),
        run_property("decoder: intact files always decode", real(),
                     decode.test_intact_files_always_decode.hypothesis.inner_test, args.cases // 5, args.seed),
        run_property("decoder: JPEG headers read as libjpeg reads them", fuzzed(formats=("JPEG",)),
                     decode.test_jpeg_headers_are_read_as_libjpeg_reads_them.hypothesis.inner_test,
                     args.cases // 2, args.seed),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, _ = train_stripes_run(Path(tmp))
        with running_server(run_dir, backend="torch", warmup_batches=1) as (url, _):
            api.MAX_EXAMPLES = args.api_cases
            for mode in (api.GenerationMode.POSITIVE, api.GenerationMode.NEGATIVE):
                start = time.perf_counter()
                try:
                    api.test_every_answer_matches_the_schema_and_none_is_a_5xx(url, mode)
                    ok = True
                except Exception as err:  # noqa: BLE001 - schemathesis has printed the failing request
                    print(f"  FAILED: {type(err).__name__}: {str(err)[:500]}")
                    ok = False
                results.append(ok)
                print(f"{'server vs its OpenAPI schema, ' + mode.value + ' requests':58s} {args.api_cases:>7,} cases  "
                      f"{'all passed' if ok else 'FAILED':10s}  {time.perf_counter() - start:7.1f} s", flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
