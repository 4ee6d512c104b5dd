"""Worker of tests/test_distributed.py, started on 2 CPU processes by ``accelerate launch --multi_gpu``.

    python tests/ddp_worker.py search OUT -- <nasiam-search flags>
    python tests/ddp_worker.py pretrain OUT -- <nasiam-pretrain flags>

``search`` first makes one alpha step and one weight step of a SimCLR supernet on this rank's shard of a fixed
global batch and dumps the states, then runs the real search command; ``pretrain`` runs the real pretraining
command. Each rank writes its final model state to ``OUT/rank{r}.safetensors`` so the test can compare ranks.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def one_step_of_each(out: Path) -> None:
    from accelerate import Accelerator

    from nasiam_hf import NASiamConfig, NASiamForArchitectureSearch
    from nasiam_hf.optimization import weight_step
    from nasiam_hf.search import alpha_step

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)  # identical initial supernet on every rank
    model = NASiamForArchitectureSearch(NASiamConfig(framework="simclr", image_size=8, projector_layers=2,
                                                       zero_init_residual=False))
    generator = torch.Generator().manual_seed(123)
    batch = 4
    views = torch.randn(2, world * batch, 3, 8, 8, generator=generator)
    shard = {"pixel_values": views[0, rank * batch:(rank + 1) * batch],
             "pixel_values_2": views[1, rank * batch:(rank + 1) * batch]}
    if rank == 0:
        save_file(state(model), str(out / "step_before.safetensors"))
        save_file({"views": views}, str(out / "step_batch.safetensors"))
    weight_opt = torch.optim.SGD(model.weight_parameters(), lr=0.1)
    arch_opt = torch.optim.Adam(model.arch_parameters(), lr=0.01)
    ddp_model, weight_opt, arch_opt = accelerator.prepare(model, weight_opt, arch_opt)
    alpha_step(accelerator.unwrap_model(ddp_model), shard, arch_opt, accelerator)
    weight_step(ddp_model, shard, weight_opt, None, accelerator)
    save_file(state(accelerator.unwrap_model(ddp_model)), str(out / f"step_rank{rank}.safetensors"))
    accelerator.wait_for_everyone()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    flags = sys.argv[sys.argv.index("--") + 1:]
    out.mkdir(parents=True, exist_ok=True)
    from nasiam_hf import PretrainCommand, SearchCommand, run_pretrain, run_search

    if mode == "search":
        one_step_of_each(out)
        model = run_search(SearchCommand.parse(flags))
    else:
        model = run_pretrain(PretrainCommand.parse(flags))
    rank = int(os.environ.get("RANK", "0"))
    save_file(state(model), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": int(os.environ.get("WORLD_SIZE", "1"))}))


if __name__ == "__main__":
    main()
