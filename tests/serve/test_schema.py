"""The server against its own OpenAPI schema, fuzzed by schemathesis over real HTTP: every route
it documents gets generated requests (good and bad parameters, random bodies in every documented
content type, real images of random sizes, wrong methods), and every answer must be documented,
match its schema, and never be a 5xx. Bounded: MAX_EXAMPLES requests per generation mode."""
import io
from collections import Counter

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serve_helpers import one_torch_thread, running_server, train_stripes_run  # noqa: F401

MAX_EXAMPLES = 150  # requests per generation mode, spread over the routes


def _image(fmt: str, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


# a body sent as image/jpeg or image/png is a real image of that type (any size from 1x1 to 96x96),
# so requests that fit the schema also reach the model; other content types get arbitrary bytes
for _fmt in ("JPEG", "PNG"):
    schemathesis.openapi.media_type(f"image/{_fmt.lower()}", st.builds(
        _image, st.just(_fmt), st.integers(1, 96), st.integers(1, 96), st.integers(0, 2**32 - 1)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir, _ = train_stripes_run(tmp_path_factory.mktemp("schema"))
    with running_server(run_dir, backend="torch", warmup_batches=1) as (url, _):
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_matches_the_schema_and_none_is_a_5xx(server, mode):
    """Requests that fit the schema (positive) and requests that break it (negative): schemathesis'
    checks (documented status, content type and headers, body matching its schema, invalid input
    refused with a 4xx) on every answer."""
    spec = schemathesis.openapi.from_url(f"{server}/openapi.json")
    seen = Counter()

    @given(case=spec.as_strategy(mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        # positive_data_acceptance expects a 2xx for every schema-valid request, but a schema cannot say
        # "these bytes decode as an image": random application/octet-stream bytes rightly get a 400
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        seen[f"{case.method} {case.path}"] += 1
        seen[f"{case.method} {case.path} {response.status_code}"] += 1
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text)

    check()
    operations = {f"{r.ok().method.upper()} {r.ok().path}" for r in spec.get_all_operations()}
    if mode == GenerationMode.NEGATIVE:  # only routes that take input can be sent invalid input
        operations = {"POST /v1/predict", "POST /v1/predict/batch"}
    assert operations <= set(seen), f"not every route was exercised: {operations - set(seen)}"
    if mode == GenerationMode.POSITIVE:
        assert seen["POST /v1/predict 200"] > 0, seen  # real images got real answers
