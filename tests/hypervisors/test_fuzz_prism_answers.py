"""Fuzzing what Prism answers, with hypothesis: real recorded answers and answers in the shapes
the client reads, with fields deleted, retyped or replaced by arbitrary JSON. Each parses into a
model or is refused with an ApiServerError naming the endpoint; never a KeyError, TypeError or
AttributeError from deep in a job.

`AHVBACKUP_FUZZ_EXAMPLES` raises the number of examples, as in tests/core/test_fuzz_inputs.py.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import specs_dir

from ahvbackup.core.errors import ApiServerError
from ahvbackup.hypervisors.ahv.client.models import (
    ChangedRegions,
    Cluster,
    CreateResult,
    IdempotenceIds,
    Image,
    Task,
    User,
    Vm,
    VmSnapshot,
    task_uuids,
)

EXAMPLES = int(os.environ.get("AHVBACKUP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
UUID = "537e0352-0af0-4aa5-af01-28e5964c5e80"


def _recorded(name: str) -> Any:
    [exchange] = json.loads((specs_dir() / "recorded" / f"{name}.json").read_text())
    return exchange["response_body"]


def _samples() -> list[tuple[str, Callable[[Any], object], Any]]:
    """(endpoint, parser, a valid answer) for every model the client reads."""
    vm_list = _recorded("v3_TestOperations_ListVM")
    clusters = _recorded("v3_TestOperations_ListCluster")
    return [
        ("GET /vms/{uuid}", lambda d: Vm.from_api(d, endpoint="GET /vms/{uuid}"),
         _recorded("v3_TestOperations_GetVM")),
        ("POST /vms/list", lambda d: Vm.from_api(d, endpoint="POST /vms/list"),
         vm_list["entities"][0]),
        ("POST /clusters/list", lambda d: Cluster.from_api(d, endpoint="POST /clusters/list"),
         clusters["entities"][0]),
        ("POST /idempotence_identifiers",
         lambda d: IdempotenceIds.from_api(d, endpoint="POST /idempotence_identifiers"),
         _recorded("v3_TestOperations_CreateIdempotenceIdentifers")),
        ("GET /tasks/{uuid}", lambda d: Task.from_api(d, endpoint="GET /tasks/{uuid}"),
         {"uuid": UUID, "status": "FAILED", "operation_type": "VmSnapshotCreate",
          "percentage_complete": 100, "progress_message": "done", "error_code": "13",
          "error_detail": "no space", "entity_reference_list": [{"kind": "vm", "uuid": UUID}]}),
        ("GET /vm_snapshots/{uuid}",
         lambda d: VmSnapshot.from_api(d, endpoint="GET /vm_snapshots/{uuid}"),
         {"metadata": {"uuid": UUID, "kind": "vm_snapshot"},
          "spec": {"name": "s", "resources": {"entity_uuid": UUID}},
          "status": {"name": "s", "state": "COMPLETE", "snapshot_type": "CRASH_CONSISTENT",
                     "expiration_time_msecs": 1, "resources": {"entity_uuid": UUID},
                     "snapshot_file_list": [{"file_path": "/c/d", "snapshot_file_path": "/c/s"}],
                     "message_list": [{"message": "m", "reason": "r"}]}}),
        ("POST /data/changed_regions",
         lambda d: ChangedRegions.from_api(d, endpoint="POST /data/changed_regions"),
         {"region_list": [{"offset": 0, "length": 4096, "region_type": "REGULAR"},
                          {"offset": 8192, "length": 4096, "type": "ZEROED"}],
          "file_size": 1 << 20, "next_offset": 12288}),
        ("GET /images/{uuid}", lambda d: Image.from_api(d, endpoint="GET /images/{uuid}"),
         {"metadata": {"uuid": UUID}, "spec": {"name": "i", "resources": {}},
          "status": {"name": "i", "state": "COMPLETE",
                     "resources": {"image_type": "DISK_IMAGE", "size_bytes": 4096,
                                   "source_uri": "nfs://x"}}}),
        ("POST /vms", lambda d: (CreateResult.from_api(d, endpoint="POST /vms"),
                                 task_uuids(d)),
         {"metadata": {"uuid": UUID}, "status": {"execution_context": {"task_uuid": UUID}}}),
        ("GET /users/me", lambda d: User.from_api(d, endpoint="GET /users/me"),
         {"metadata": {"uuid": UUID, "name": "u"},
          "status": {"name": "u", "resources": {"display_name": "U", "username": "u"}}}),
    ]


SAMPLES = _samples()
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)
edit = st.tuples(st.sampled_from(["delete", "replace", "wrap", "empty"]),
                 st.integers(0, 10_000), json_value)


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into `value` (dict keys and list indexes), the root included."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, (*path, i))
    return out


def _edit(answer: Any, op: str, pick: int, value: Any) -> Any:
    answer = copy.deepcopy(answer)
    path = _nodes(answer)[pick % len(_nodes(answer))]
    if not path:
        return value if op == "replace" else [answer] if op == "wrap" else {}
    parent = answer
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "wrap":
        parent[last] = [parent[last]]
    else:
        parent[last] = {} if isinstance(parent[last], dict) else [] \
            if isinstance(parent[last], list) else ""
    return answer


def test_every_sample_is_a_valid_answer() -> None:
    """The fuzzing starts from answers the client accepts (else it only fuzzes refusals)."""
    for endpoint, parse, answer in SAMPLES:
        assert parse(answer), endpoint


@FUZZ
@given(which=st.integers(0, len(SAMPLES) - 1), edits=st.lists(edit, min_size=1, max_size=3))
def test_a_damaged_prism_answer_parses_or_is_refused_naming_the_endpoint(
        which: int, edits: list[tuple[str, int, Any]]) -> None:
    endpoint, parse, answer = SAMPLES[which]
    for op, pick, value in edits:
        answer = _edit(answer, op, pick, value)
    refusal = ""
    try:
        parse(answer)
    except ApiServerError as err:
        refusal = str(err)
    assert not refusal or (endpoint in refusal and "does not parse" in refusal), refusal
