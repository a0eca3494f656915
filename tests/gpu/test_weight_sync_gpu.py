"""The broadcast weight sync's NCCL backend (cluster.weight_sync): CUDA tensors of
several dtypes arrive bit for bit, bucket by bucket. NCCL refuses two ranks on one
device, so this needs two GPUs; the same protocol runs on gloo in
tests/unit/test_weight_sync.py."""

import pytest

pytestmark = pytest.mark.gpu


def _rank(rank: int, port: int, queue) -> None:
    import torch

    from cluster.weight_sync import new_group, receive_buckets, rendezvous, send_buckets

    torch.cuda.set_device(rank)
    store = rendezvous("127.0.0.1", port, 2, 60.0, host_it=rank == 0)
    group = new_group(store, rank, 2, "nccl", 60.0, "gpu-test")
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
          "c": torch.arange(11)}
    if rank == 0:
        queue.put(send_buckets(group, sd.items(), max_bytes=4096, device="cuda"))
    else:
        got = {n: t.cpu() for n, t in receive_buckets(group, "cuda")}
        queue.put(all(torch.equal(got[n], t) and got[n].dtype == t.dtype
                      for n, t in sd.items()) and list(got) == list(sd))


def test_nccl_broadcast_of_buckets():
    import socket

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs a device per rank: two GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in (0, 1)]
    [p.start() for p in procs]
    results = [queue.get(timeout=120) for _ in procs]
    [p.join(timeout=60) for p in procs]
    sent = next(r for r in results if isinstance(r, dict))
    assert sent["buckets"] >= 2 and True in results
