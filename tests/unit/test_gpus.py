"""GPU placement: nvidia-smi parsing, type matching, the fit check, picking, the ledger."""

from __future__ import annotations

import threading

import pytest

from skybatch.errors import PoolError, PoolSpecError
from skybatch.pools.gpus import (
    Gpu,
    GpuLedger,
    Held,
    check_fits,
    cuda_env,
    describe,
    matches,
    parse_nvidia_smi,
    pick,
)

FOUR_L4 = [Gpu(i, "NVIDIA L4", 23034, f"GPU-{i}") for i in range(4)]


def test_parse_with_and_without_units() -> None:
    text = (
        "0, NVIDIA A100-SXM4-80GB, 81920 MiB, GPU-aaaa\n"
        "1, NVIDIA A100-SXM4-80GB, 81920, GPU-bbbb\n"
        "\n"
        "2, Weird, Name, [N/A], GPU-cccc\n"
    )
    assert parse_nvidia_smi(text) == [
        Gpu(0, "NVIDIA A100-SXM4-80GB", 81920, "GPU-aaaa"),
        Gpu(1, "NVIDIA A100-SXM4-80GB", 81920, "GPU-bbbb"),
        Gpu(2, "Weird, Name", None, "GPU-cccc"),
    ]
    assert parse_nvidia_smi("") == []


def test_parse_refuses_what_is_not_a_row() -> None:
    with pytest.raises(ValueError, match="unexpected nvidia-smi output line 'No devices'"):
        parse_nvidia_smi("No devices\n")


@pytest.mark.parametrize(
    ("name", "wanted", "expected"),
    [
        ("NVIDIA L4", "L4", True),
        ("NVIDIA L4", "l4", True),
        ("NVIDIA L40S", "L4", False),
        ("NVIDIA L40S", "L40S", True),
        ("NVIDIA A100-SXM4-80GB", "A100", True),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb", True),
        ("NVIDIA A100-SXM4-40GB", "A100-80GB", False),
        ("NVIDIA A100 80GB PCIe", "A10", False),
        ("NVIDIA A10G", "A10G", True),
        ("NVIDIA H100 80GB HBM3", "H100", True),
        ("NVIDIA GeForce RTX 4090", "RTX4090", True),
        ("Tesla T4", "T4", True),
    ],
)
def test_type_matching(name: str, wanted: str, expected: bool) -> None:
    assert matches(name, wanted) is expected


def test_describe_says_who_holds_what() -> None:
    assert describe(FOUR_L4[:2], {1: "a"}) == (
        "0: NVIDIA L4 (22 GiB, free), 1: NVIDIA L4 (22 GiB, pool a)"
    )


def test_a_pool_that_fits_passes() -> None:
    check_fits(FOUR_L4, {}, "L4:2", 2, "this machine")
    check_fits(FOUR_L4, {0: "a"}, "L4:1", 3, "this machine")


def test_too_many_workers_is_one_line_listing_the_gpus() -> None:
    with pytest.raises(PoolSpecError) as e:
        check_fits(FOUR_L4, {3: "other"}, "L4:2", 2, "this machine")
    assert str(e.value) == (
        "pool asks for 2 workers × L4:2 but this machine has 3 L4 GPUs free: "
        "0: NVIDIA L4 (22 GiB, free), 1: NVIDIA L4 (22 GiB, free), "
        "2: NVIDIA L4 (22 GiB, free), 3: NVIDIA L4 (22 GiB, pool other); "
        "lower pool.workers or the count in resources.accelerators"
    )


def test_a_missing_type_names_what_is_there() -> None:
    with pytest.raises(PoolSpecError) as e:
        check_fits(FOUR_L4[:1], {}, "A100:1", 1, "host gpu-a")
    assert str(e.value) == (
        "pool asks for A100 GPUs but host gpu-a has none: 0: NVIDIA L4 (22 GiB, free); "
        "set resources.accelerators to a type it has"
    )


def test_no_gpu_at_all() -> None:
    with pytest.raises(PoolSpecError) as e:
        check_fits([], {}, "L4:1", 1, "this machine")
    assert str(e.value) == (
        "pool asks for L4 GPUs but this machine has no GPU that nvidia-smi lists; "
        "drop resources.accelerators or run the pool where the GPUs are"
    )


def test_pick_takes_the_lowest_free_of_the_type() -> None:
    mixed = [Gpu(0, "NVIDIA T4", 15360, "a"), *FOUR_L4[1:]]
    assert pick(mixed, {1: "x"}, "L4:2", "here") == [2, 3]
    with pytest.raises(PoolError, match=r"^a worker needs L4:3 but here has 2 L4 GPUs free: 0:"):
        pick(mixed, {1: "x"}, "L4:3", "here")


def test_cuda_env_numbers_gpus_as_nvidia_smi_does() -> None:
    assert cuda_env([2, 3]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert cuda_env([])["CUDA_VISIBLE_DEVICES"] == ""


OTHER_L4 = [Gpu(i, "NVIDIA L4", 23034, f"GPU-other-{i}") for i in range(4)]


def _indices(gpus: list[Gpu]) -> list[int]:
    return [g.index for g in gpus]


def test_ledger_claims_are_disjoint_under_concurrent_launches() -> None:
    ledger = GpuLedger()
    chosen: dict[int, list[int]] = {}
    barrier = threading.Barrier(4)

    def launch(worker_id: int) -> None:
        barrier.wait(timeout=10)
        chosen[worker_id] = _indices(ledger.claim(worker_id, "p", "h", FOUR_L4, "L4:1", "h"))

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(g for gs in chosen.values() for g in gs) == [0, 1, 2, 3]
    with pytest.raises(PoolError):
        ledger.claim(5, "p", "h", FOUR_L4, "L4:1", "h")
    # Another machine's GPUs are its own.
    assert _indices(ledger.claim(5, "p", "other", OTHER_L4, "L4:1", "other")) == [0]


def test_one_machine_named_two_ways_never_hands_a_gpu_out_twice() -> None:
    ledger = GpuLedger()
    assert ledger.claim(1, "a", "host-0", FOUR_L4[:1], "L4:1", "host-0") == [FOUR_L4[0]]
    # Before: claims were keyed by the host's name, so root@host-0 got GPU 0 again.
    with pytest.raises(
        PoolError, match=r"^a worker needs L4:1 but host root@host-0 has 0 L4 GPUs free: "
        r"0: NVIDIA L4 \(22 GiB, pool a\)$",
    ):  # fmt: skip
        ledger.claim(2, "b", "root@host-0", FOUR_L4[:1], "L4:1", "host root@host-0")
    held = ledger.held(exclude_pool="b")
    assert held.on("host-0:22", FOUR_L4) == {0: "a"}
    assert held.on("host-1", OTHER_L4) == {}
    assert ledger.held(exclude_pool="a") == Held()


def test_ledger_sync_frees_the_gone_keeps_launches_and_learns_handles() -> None:
    ledger = GpuLedger()
    ledger.claim(1, "a", "h", FOUR_L4, "L4:2", "h")  # worker 1: [0, 1], launching
    ledger.claim(2, "b", "h", FOUR_L4, "L4:1", "h")  # worker 2: [2], then lost
    # Worker 1's launch is under way (no handle yet); worker 3 came from an earlier
    # server's handle; worker 2 is no longer live.
    ledger.sync([(1, "a", {}), (3, "c", {"host": "h", "gpus": [3], "gpu_uuids": ["GPU-3"]})])
    assert ledger.held().on("h", FOUR_L4) == {0: "a", 1: "a", 3: "c"}
    assert ledger.held(exclude_pool="a").on("h", FOUR_L4) == {3: "c"}
    # By UUID: the handle's GPU is held under any name of its machine.
    assert ledger.held().on("root@h", FOUR_L4) == {0: "a", 1: "a", 3: "c"}
    # The lost worker's replacement gets its GPU back.
    assert _indices(ledger.claim(4, "b", "h", FOUR_L4, "L4:1", "h")) == [2]


def test_a_handle_without_uuids_holds_by_host_and_index() -> None:
    ledger = GpuLedger()
    # Written by a server from before UUIDs were kept.
    ledger.sync([(1, "old", {"host": "h", "gpus": [1]})])
    assert ledger.held().on("h", FOUR_L4) == {1: "old"}
    assert ledger.held().on("other", OTHER_L4) == {}
    assert _indices(ledger.claim(2, "new", "h", FOUR_L4, "L4:2", "h")) == [0, 2]
