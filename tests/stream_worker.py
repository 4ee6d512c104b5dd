"""Worker of tests/test_stream_commands.py, started on 2 CPU processes by ``accelerate launch --multi_gpu``.

    python tests/stream_worker.py OUT -- <nasiam-pretrain flags, with --streaming>

Runs the real pretraining command with :meth:`nasiam_hf.feeds.StreamFeed.groups` wrapped so that every ``index``
this rank's training feed hands to the loop is recorded, epoch by epoch; writes them to ``OUT/seen-rank{r}.json``
with the world size and the updates per epoch the feed announced.
"""

import json
import os
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    flags = sys.argv[sys.argv.index("--") + 1:]
    out.mkdir(parents=True, exist_ok=True)
    from nasiam_hf import PretrainCommand, run_pretrain
    from nasiam_hf.feeds import StreamFeed

    seen: dict[str, list[int]] = {}
    announced: dict[str, int | None] = {}
    groups = StreamFeed.groups

    def recording_groups(self, epoch, start=0):
        announced[str(epoch)] = self.updates_in_epoch(epoch)
        for group in groups(self, epoch, start):
            seen.setdefault(str(epoch), []).extend(i for batch in group for i in batch["index"].tolist())
            yield group

    StreamFeed.groups = recording_groups
    run_pretrain(PretrainCommand.parse(flags))
    rank = int(os.environ.get("RANK", "0"))
    record = {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "updates": announced, "seen": seen}
    (out / f"seen-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
