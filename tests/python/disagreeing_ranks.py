"""A two-rank worker for test_train_gpt.py: `train` snapshots steps 4 and 8 (rank 1 only step 4,
as if it died before sealing 8); `restore` calls restore_latest() and prints what happened.

Usage: disagreeing_ranks.py RANK INIT_METHOD train|restore   (TESSERA_SOCKET set)
"""

import sys

import torch
import torch.distributed as dist

import tessera
import tessera.torch

rank, init_method, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
snapshotter = tessera.torch.Snapshotter(model, optimizer, job_id="disagreeing", when_busy="wait")
if phase == "train":
    for step in range(9):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        if step == 4 or (step == 8 and rank == 0):
            snapshotter.snapshot(step)
            snapshotter.wait()
        if step == 4:
            dist.barrier()  # data-parallel ranks move in step: both sealed 4 before rank 0 goes on
    snapshotter.close()
    print(f"rank {rank}: trained")
else:
    try:
        restored = snapshotter.restore_latest()
    except tessera.FailedPreconditionError as e:
        print(f"rank {rank}: refused: {e}")
        sys.exit(3)
    print(f"rank {rank}: restored step {restored}")
dist.destroy_process_group()
