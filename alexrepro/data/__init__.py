"""The data side of the pipeline: reading a download (sources), resizing (imaging), the shard format, the prepare
and stats stages, and the training input (augmentation, loader, device feed). Imports core only."""
