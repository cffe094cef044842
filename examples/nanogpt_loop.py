"""nanoGPT's train.py, cut down to its loop and protected by Tessera: the lines marked
`# tessera` are all that was added (README.md, "Protecting a loop you did not write", shows them
as a diff).

What makes this loop hard to resume, and what the added lines do about it:
  * the next batch is drawn *before* the snapshot point (`X, Y = get_batch('train')` before the
    loop and after each micro-step's forward), so restoring the RNG alone would resume one batch
    off: X and Y go into the snapshot through `user_state`, a callable read only when a snapshot
    is taken, and come back through `load_user_state`;
  * `best_val_loss` changes at evaluations: `user_state` too;
  * the GradScaler has state of its own (enabled with float16 on a GPU): `stateful=`;
  * the learning rate comes from get_lr(iter_num): the restored step gives iter_num back;
  * a finished run must not be resumed by the next launch with the same job id: the last
    iteration is not snapshotted (nanoGPT's loop tests for its end after the body, so a resume
    after it would train one iteration too many), and the run drops its snapshots when it ends
    (`close(drop=True)`).

Killed at any instant and started again with the same TESSERA_JOB_ID, it prints the same losses
(`float.hex`) at every iteration as a run that was never interrupted.

    TESSERA_SOCKET=/run/tessera/agent.sock TESSERA_JOB_ID=nano python3 examples/nanogpt_loop.py \
        --data_dir=/tmp/nano-data --max_iters=200

Settings are nanoGPT's names, given as --key=value (nanoGPT's configurator.py). The data set is
made up (random tokens written once to train.bin and val.bin under data_dir, read with np.memmap
as nanoGPT reads them); the model is examples/train_gpt.py's, returning (logits, loss) as
nanoGPT's does. Needs the tessera package (agent/python) and libtessera.so, found as
train_gpt.py finds them.
"""

import math
import os
import sys
import time
from ast import literal_eval
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from train_gpt import GPT as _GPT  # puts agent/python on sys.path

import tessera.torch  # tessera

# -----------------------------------------------------------------------------
# nanoGPT's settings, scaled down to run in seconds on a CPU
out_dir = 'out'
eval_interval = 10
log_interval = 1
eval_iters = 4
data_dir = 'data/nanogpt_loop'
gradient_accumulation_steps = 2
batch_size = 4
block_size = 16
vocab_size = 64
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.1
learning_rate = 1e-3
max_iters = 40
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 5
lr_decay_iters = 40
min_lr = 1e-4
backend = 'gloo'
device = 'cpu'
dtype = 'float16'  # on a GPU: autocast to float16, with the GradScaler enabled
snapshot_interval = 3  # tessera
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
for arg in sys.argv[1:]:  # nanoGPT's configurator.py, for --key=value only
    if not arg.startswith('--') or '=' not in arg:
        sys.exit(f"usage: nanogpt_loop.py [--key=value ...]; got {arg!r}")
    key, val = arg[2:].split('=', 1)
    if key not in config_keys:
        sys.exit(f"unknown setting {key!r}; known: {', '.join(config_keys)}")
    try:
        attempt = literal_eval(val)
    except (SyntaxError, ValueError):
        attempt = val
    if type(attempt) != type(globals()[key]):
        sys.exit(f"--{key} must be a {type(globals()[key]).__name__}, got {val!r}")
    globals()[key] = attempt
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    init_process_group(backend=backend)
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    if 'cuda' in device:
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0
    seed_offset = ddp_rank
else:
    master_process = True
    seed_offset = 0
torch.manual_seed(1337 + seed_offset)
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type,
                                                                   dtype=ptdtype)

if master_process and not os.path.exists(os.path.join(data_dir, 'val.bin')):
    os.makedirs(data_dir, exist_ok=True)
    tokens = np.random.RandomState(7).randint(0, vocab_size, size=4096).astype(np.uint16)
    tokens[:3584].tofile(os.path.join(data_dir, 'train.bin'))
    tokens[3584:].tofile(os.path.join(data_dir, 'val.bin'))


def get_batch(split):
    data = np.memmap(os.path.join(data_dir, 'train.bin' if split == 'train' else 'val.bin'),
                     dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64))
                     for i in ix])
    if device_type == 'cuda':
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device,
                                                                               non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


class GPT(_GPT):
    """nanoGPT's interface: forward(idx, targets) returns (logits, loss)."""

    def forward(self, idx, targets=None):
        logits = super().forward(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


iter_num = 0
best_val_loss = 1e9
model = GPT(vocab_size, block_size, n_embd, n_layer, n_head, dropout)
model.to(device)
scaler = torch.cuda.amp.GradScaler(enabled=(dtype == 'float16' and device_type == 'cuda'))
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                              weight_decay=weight_decay)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


X, Y = get_batch('train')  # fetch the very first batch
snapshotter = tessera.torch.Snapshotter(  # tessera
    model, optimizer, every=snapshot_interval, stateful={'scaler': scaler},  # tessera
    user_state=lambda: {'X': X, 'Y': Y, 'best_val_loss': best_val_loss},  # tessera
    load_user_state=lambda state: globals().update(state))  # tessera
restored = snapshotter.restore_latest()  # tessera
if restored is not None:  # tessera
    iter_num = restored + 1  # tessera
print('fresh start' if restored is None else f'resumed from iteration {restored}', flush=True)
t0 = time.time()
local_iter_num = 0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if iter_num % eval_interval == 0 and master_process:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train'].item().hex()}, "
              f"val loss {losses['val'].item().hex()}", flush=True)
        if losses['val'] < best_val_loss:
            best_val_loss = losses['val']  # nanoGPT saves out_dir/ckpt.pt here

    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps
        X, Y = get_batch('train')  # prefetched: drawn before the snapshot point
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if iter_num < max_iters:  # tessera: the last iteration ends the run, never resume after it
        snapshotter.step(iter_num)  # tessera

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        lossf = loss.item() * gradient_accumulation_steps
        # The loss as float.hex(), so that runs compare to the last bit.
        print(f"iter {iter_num}: loss {lossf.hex()}, time {dt * 1000:.2f}ms", flush=True)
    iter_num += 1
    local_iter_num += 1
    if iter_num > max_iters:
        snapshotter.close(drop=True)  # tessera: the run is over: a relaunch starts afresh
        break

if ddp:
    destroy_process_group()
