"""``decur prepare``: write a pretraining datamodule's training samples in litdata's streaming format.

The datamodule is given as in ``decur fit`` (the ``data:`` section of a fit config, or
``--data.class_path`` / ``--data.init_args.*``); the other sections of a fit config are ignored.
The result is read by :class:`~decur_lightning.datamodules.StreamingPretrainDataModule` from the
folder or from a copy on object storage.

Examples:
    decur prepare --config examples/configs/pretrain_ssl4eo.yaml --output /data/ssl4eo-litdata
    decur prepare --data SSL4EOS12MMDataModule --data.init_args.root /data/ssl4eo-s12 \\
        --output /data/ssl4eo-litdata --num_workers 8
    python -m decur_lightning.prepare --data GeoNRWMMPretrainDataModule --data.init_args.root /data/geonrw \\
        --output /data/geonrw-litdata --quantize uint8

``litdata.optimize`` switches its process's multiprocessing start method (to ``spawn`` by default);
the writing therefore runs in a child process of its own (:func:`prepare`), leaving the caller's
untouched.
"""

from __future__ import annotations

import multiprocessing
import sys
import traceback
from typing import Any

__all__ = ["main", "prepare"]


def _write_in_child(connection: Any, datamodule: Any, output_dir: str, options: dict[str, Any]) -> None:
    import torch

    from decur_lightning.datamodules.streaming import write_stream

    torch.set_num_threads(1)  # the writer processes are the parallelism (and OpenMP is not fork-safe)
    try:
        connection.send(("ok", write_stream(datamodule, output_dir, **options)))
    except BaseException as error:  # report every failure to the parent, with its type
        try:
            connection.send(("error", error, traceback.format_exc()))
        except Exception:  # the exception itself does not pickle
            connection.send(("error", RuntimeError(f"{type(error).__name__}: {error}"), traceback.format_exc()))
    finally:
        connection.close()


def writer_start_method() -> str:
    """``"fork"`` on Linux (no re-import of the library in the writing processes), else ``"spawn"``."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def prepare(
    datamodule: Any,
    output_dir: str,
    *,
    quantize: str | None = None,
    chunk_bytes: str | int = "64MB",
    compression: str | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``datamodule``'s training samples to ``output_dir`` in a separate process.

    ``litdata.optimize`` sets its process's multiprocessing start method (``force=True``); it runs
    in a child process (forked on Linux, spawned elsewhere), with its own workers started the same
    way, so the caller's start method is left as it was. See :func:`~decur_lightning.datamodules.streaming.write_stream` for the arguments and the
    format. The datamodule is pickled to the child; errors raised there are raised here with their
    type.

    Returns:
        the metadata written next to the chunks.
    """
    context = multiprocessing.get_context(writer_start_method())
    receiver, sender = context.Pipe(duplex=False)
    options = dict(
        quantize=quantize,
        chunk_bytes=chunk_bytes,
        compression=compression,
        num_workers=num_workers,
        overwrite=overwrite,
        start_method=context.get_start_method(),
    )
    process = context.Process(target=_write_in_child, args=(sender, datamodule, str(output_dir), options))
    process.start()
    sender.close()
    try:
        message = receiver.recv()
    except EOFError:
        message = None
    process.join()
    if message is None:
        raise RuntimeError(f"decur prepare: the writing process died (exit code {process.exitcode}) without a result")
    if message[0] == "error":
        error, child_traceback = message[1], message[2]
        raise error from RuntimeError(f"in the writing process:\n{child_traceback}")
    return message[1]


def _parser() -> Any:
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    import decur_lightning.datamodules  # noqa: F401  (datamodules usable by class name)

    parser = ArgumentParser(
        prog="decur prepare",
        description="Write a pretraining datamodule's training samples in litdata's streaming format "
        "(read them with StreamingPretrainDataModule).",
    )
    parser.add_argument("--config", type=str, default=None, help="a fit config: its data: section is used")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True, help="the source datamodule")
    parser.add_argument("--output", type=str, required=True, help="local folder to write (chunks and metadata)")
    parser.add_argument("--quantize", type=str | None, default=None, help="None (native types) or uint8 (lossy)")
    parser.add_argument("--chunk_bytes", type=str, default="64MB", help="litdata chunk size")
    parser.add_argument("--compression", type=str | None, default=None, help="None or zstd")
    parser.add_argument("--num_workers", type=int, default=1, help="writer processes")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace a non-empty output folder")
    parser.add_argument("--seed_everything", type=int | None, default=None, help="global seed (default: the config's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``decur prepare`` (``argv`` defaults to ``sys.argv[1:]``); prints the metadata's summary."""
    import json

    import yaml
    from lightning import seed_everything

    argv = list(sys.argv[1:] if argv is None else argv)
    seed: int | None = None
    if "--config" in argv:  # keep only the data: section (and the seed) of a fit config
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a file name")
        with open(argv[position + 1]) as f:
            config = yaml.safe_load(f) or {}
        if "data" not in config:
            raise ValueError(f"{argv[position + 1]} has no data: section to prepare")
        seed = config.get("seed_everything") if isinstance(config.get("seed_everything"), int) else None
        argv = argv[:position] + ["--data", json.dumps(config["data"])] + argv[position + 2 :]
    parser = _parser()
    parsed = parser.parse_args(argv)
    seed = parsed.seed_everything if parsed.seed_everything is not None else seed
    seed_everything(0 if seed is None else seed)
    datamodule = parser.instantiate_classes(parsed).data
    metadata = prepare(
        datamodule,
        parsed.output,
        quantize=parsed.quantize,
        chunk_bytes=parsed.chunk_bytes,
        compression=parsed.compression,
        num_workers=parsed.num_workers,
        overwrite=parsed.overwrite,
    )
    print(
        f"decur prepare: wrote {metadata['num_samples']} samples of {metadata['source']} to {parsed.output} "
        f"({'lossy uint8' if metadata['lossy'] else 'native types, lossless'}); stream them with "
        f"StreamingPretrainDataModule(input_dir={parsed.output!r})"
    )


if __name__ == "__main__":
    main()
