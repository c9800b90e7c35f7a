"""Recorded real Prism v3 answers parse through the client's models; bad answers fail clearly."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from tests.conftest import specs_dir

from ahvbackup.core.errors import ApiServerError
from ahvbackup.hypervisors.ahv.client.models import (
    ChangedRegions,
    Cluster,
    CreateResult,
    IdempotenceIds,
    Task,
    Vm,
    VmSnapshot,
)


def recorded() -> dict[str, list[dict[str, Any]]]:
    files = sorted((specs_dir() / "recorded").glob("v3_*.json"))
    assert files, "no recorded v3 responses found"
    return {f.stem: json.loads(f.read_text()) for f in files}


def one(name: str) -> dict[str, Any]:
    [exchange] = recorded()[name]
    return exchange


def parser_for(path: str) -> Any:
    if path.endswith("/vms/list"):
        return lambda body: [Vm.from_api(e, endpoint=path) for e in body["entities"]]
    if path.endswith("/clusters/list"):
        return lambda body: [Cluster.from_api(e, endpoint=path) for e in body["entities"]]
    if "/vms/" in path:
        return lambda body: Vm.from_api(body, endpoint=path)
    if path.endswith("/idempotence_identifiers"):
        return lambda body: IdempotenceIds.from_api(body, endpoint=path)
    raise AssertionError(f"no model for recorded path {path}; add one")


def test_every_recorded_v3_answer_parses() -> None:
    parsed = 0
    for name, exchanges in recorded().items():
        for ex in exchanges:
            result = parser_for(ex["path"])(ex["response_body"])
            assert result, f"{name}: parsed to nothing"
            parsed += 1
    assert parsed >= 4


def test_recorded_vm_has_its_disk_nic_and_placement() -> None:
    vm = Vm.from_api(one("v3_TestOperations_GetVM")["response_body"])
    assert vm.uuid == "bdbbad7a-a401-4f9a-a789-2b8406905b56"
    assert vm.name == "test-vm"
    assert vm.cluster_uuid == "00061f7f-44f7-19dc-3be1-7cc25586ee44"
    assert (vm.power_state, vm.num_sockets, vm.num_vcpus_per_socket, vm.memory_size_mib) == (
        "OFF", 1, 1, 1024,
    )
    [disk] = vm.disks
    assert disk.uuid == "537e0352-0af0-4aa5-af01-28e5964c5e80"
    assert (disk.device_type, disk.address, disk.size_bytes) == ("DISK", "scsi.0", 8589934592)
    assert disk.container_name == "SelfServiceContainer"
    assert vm.data_disks == (disk,)
    [nic] = vm.nics
    assert nic.mac_address == "50:6b:8d:24:19:54"
    assert nic.ip_addresses == ("10.23.129.96",)
    assert (nic.subnet_name, nic.is_connected) == ("vlan173", True)
    assert vm.ngt is None
    assert vm.spec_version == 0
    assert vm.raw["spec"]["resources"]["boot_config"]["boot_type"] == "UEFI"


def test_list_and_get_agree_on_the_same_vm() -> None:
    [listed] = parser_for("/vms/list")(one("v3_TestOperations_ListVM")["response_body"])
    got = Vm.from_api(one("v3_TestOperations_GetVM")["response_body"])
    assert listed == got


def test_recorded_clusters_tell_pc_from_aos_and_carry_the_dsip() -> None:
    body = one("v3_TestOperations_ListCluster")["response_body"]
    clusters = [Cluster.from_api(e) for e in body["entities"]]
    pcs = [c for c in clusters if c.is_prism_central]
    assert [c.name for c in pcs] == ["ncn-dev-pc"]
    ganon = next(c for c in clusters if c.name == "ganon")
    assert not ganon.is_prism_central
    assert (ganon.external_ip, ganon.dsip) == ("10.40.231.131", "10.40.231.132")
    assert pcs[0].dsip is None


def test_idempotence_identifiers_parse() -> None:
    body = one("v3_TestOperations_CreateIdempotenceIdentifers")["response_body"]
    ids = IdempotenceIds.from_api(body)
    assert ids.uuids == (
        "ab411b1a-f173-4009-9a8f-3d6e996c752a", "2515c166-dc95-4c12-8eb2-5d0aed9ad931",
    )


def test_missing_required_field_names_field_and_endpoint() -> None:
    body = copy.deepcopy(one("v3_TestOperations_GetVM")["response_body"])
    del body["status"]["resources"]["power_state"]
    expected = r"GET /vms/x.*status\.resources\.power_state is missing"
    with pytest.raises(ApiServerError, match=expected):
        Vm.from_api(body, endpoint="GET /vms/x")


def test_wrong_type_is_refused_not_coerced() -> None:
    body = copy.deepcopy(one("v3_TestOperations_GetVM")["response_body"])
    body["status"]["resources"]["disk_list"][0]["device_properties"]["disk_address"][
        "device_index"
    ] = "0"
    with pytest.raises(ApiServerError, match=r"disk_list\[0\]\.device_properties.*wrong type"):
        Vm.from_api(body, endpoint="GET /vms/x")


def test_unknown_fields_are_ignored() -> None:
    body = copy.deepcopy(one("v3_TestOperations_GetVM")["response_body"])
    body["status"]["resources"]["brand_new_feature"] = {"x": 1}
    body["future_top_level"] = [1, 2]
    assert Vm.from_api(body).name == "test-vm"


def test_ngt_capabilities() -> None:
    body = copy.deepcopy(one("v3_TestOperations_GetVM")["response_body"])
    body["status"]["resources"]["guest_tools"] = {
        "nutanix_guest_tools": {"state": "ENABLED", "enabled_capability_list": ["VSS_SNAPSHOT"]}
    }
    vm = Vm.from_api(body)
    assert vm.ngt is not None
    assert vm.ngt.can_quiesce


def test_pe_snapshot_files_match_disks_by_vmdisk_uuid() -> None:
    snap = VmSnapshot.from_api({
        "metadata": {"kind": "vm_snapshot", "uuid": "s1"},
        "status": {
            "name": "b1", "state": "COMPLETE", "snapshot_type": "CRASH_CONSISTENT",
            "resources": {"entity_uuid": "vm1"},
            "snapshot_file_list": [
                {"file_path": "/ctr/.acropolis/vmdisk/d1",
                 "snapshot_file_path": "/ctr/.snapshot/38/1-2-3/.acropolis/vmdisk/d1"},
            ],
        },
    })
    assert snap.vm_uuid == "vm1"
    assert snap.state == "COMPLETE"
    f = snap.file_for_disk("d1")
    assert f is not None
    assert f.snapshot_file_path.startswith("/ctr/.snapshot/")
    assert snap.file_for_disk("nope") is None


def test_changed_regions_page() -> None:
    page = ChangedRegions.from_api({
        "region_list": [{"offset": 0, "length": 1048576, "type": "REGULAR"},
                        {"offset": 1048576, "length": 4194304, "type": "ZEROED"}],
        "file_size": 8589934592, "next_offset": 0,
    })
    assert [r.zeroed for r in page.regions] == [False, True]
    assert page.regions[1].end == 5242880
    assert page.next_offset is None
    with pytest.raises(ApiServerError, match="region_list is missing"):
        ChangedRegions.from_api({"file_size": 1}, endpoint="POST /data/changed_regions")


def test_task_and_create_result() -> None:
    task = Task.from_api({
        "uuid": "t1", "status": "FAILED", "error_code": 12, "error_detail": "no space",
        "entity_reference_list": [{"kind": "vm", "uuid": "vm1"}],
    })
    assert task.done
    assert task.error_code == "12"
    assert task.entity_uuids == ("vm1",)
    created = CreateResult.from_api(
        {"metadata": {"uuid": "u1"}, "status": {"execution_context": {"task_uuid": ["t9"]}}}
    )
    assert (created.uuid, created.task_uuid) == ("u1", "t9")
