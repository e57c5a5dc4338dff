"""Does Ho et al.'s "SAME" downsampling padding (an F.pad before an unpadded stride-2 convolution) cost a CPU time?
The preset small network (--preset small on MNIST: ch 32, ch-mult 1,2,2, one block a level), batch 32 at 28 px, a
full training step with Adam, the old symmetric padding and "SAME" alternating, three rounds of 20 steps.

    python docs/bench_padding.py
"""
import os, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm  # noqa: E402

torch.manual_seed(0)
times = {False: [], True: []}
for _ in range(3):
    for same in (False, True):
        model = ddpm.UNet(1, 32, (1, 2, 2), 1, (), 0.0, 28, num_classes=10, same_padding=same)
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x = torch.randn(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (32,))
        y = torch.randint(0, 10, (32,))
        for step in range(23):
            if step == 3:  # after warming up
                start = time.time()
            opt.zero_grad()
            model(x, t, y).pow(2).mean().backward()
            opt.step()
        times[same].append((time.time() - start) / 20 * 1000)
for same, ms in times.items():
    print(f"{'SAME' if same else 'symmetric'}: {', '.join(f'{v:.0f}' for v in ms)} ms a step")
