"""robustops._distributed: sharded loops under torchrun give the single-process numbers."""
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import free_port
import torch

from robustops import _distributed as rd


def test_single_process_identity():
    assert rd.world() == (0, 1)
    assert rd.shard_range(7) == (0, 7)
    t = torch.arange(5)
    assert rd.gather_cat(t) is t and rd.all_reduce_sum(t) is t


@pytest.mark.slow
def test_two_cpu_ranks_match_one_process(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from robustops import _distributed as rd
        n = 11
        idx = rd.shard_indices(n)
        vals = (idx.double() ** 2)
        flags = idx % 3 == 0
        allv = rd.gather_cat(vals); allf = rd.gather_cat(flags)
        total = rd.all_reduce_sum(torch.tensor([float(vals.sum())]))
        rank, size = rd.world()
        assert size == 2, size
        assert torch.equal(allv, torch.arange(n).double() ** 2), allv
        assert torch.equal(allf, torch.arange(n) % 3 == 0)
        assert float(total) == float((torch.arange(n).double() ** 2).sum())
        if rank == 0:
            print("OK", rd.shard_range(n))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK (0, 6)" in r.stdout
