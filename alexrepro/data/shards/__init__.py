"""The shard format, and the one reader of it: webdataset tar files of 256×256 JPEGs, their member index, and the
`manifest.json` that describes them. Every stage that reads a shard reads it through `index`.

Layout of a prepared folder (DESIGN.md "Files and formats"):

    train-000000.tar …   deterministic shuffle of the whole train set (every shard mixes classes)
    val-000000.tar …     validation images in file-name order
    train-index.npy      where every sample's members lie in the train shards (one row per sample, stored order)
    val-index.npy        the same for val
    manifest.json        format, version, settings, classes, splits (counts; shard names, sizes and sha256; the
                         index's name and sha256), rejected

Each sample in a shard is two tar members with the webdataset naming convention: `<key>.jpg` (RGB JPEG) and
`<key>.cls` (class index as ASCII decimal). Keys are source file stems (`n01440764_10026`,
`ILSVRC2012_val_00000001`) and never contain a dot, because webdataset splits key from extension at the first dot.

Tars are written with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444) so the same input and settings
give byte-identical shards on any machine and with any worker count. They are USTAR tars: every member has exactly
one 512-byte header, so the writer knows each member's offset as it writes it and the index costs nothing to make.
Readers never parse tar headers: they read the index (one file read, even for ILSVRC-2012's 1.28 M images in 1,282
shards, where scanning every shard's headers took ~55 s) and then read members by offset.

Why the writer is `tarfile` and not `webdataset.TarWriter`: TarWriter wraps the same `tarfile` stream, so it could
give the same bytes, but it hides where each member lands and encodes values itself; the index needs the offsets.
Our own writer is ~20 lines and keeps existing shards byte-identical. webdataset is therefore a test dependency
only: the tests read our shards with `webdataset.WebDataset` to prove the format is standard.

Integrity (DESIGN.md "Errors and bad input"): the manifest carries each shard's size and sha256 and the index's
sha256. Loading an index checks the index's hash and every shard's size (a stat: free); `verify_shards` checks the
shards' sha256, once per shard per output folder (see there); `read_verified_shard` checks it on a whole-shard
read at no extra I/O. Names from the manifest are plain file names, confined to the folder.
"""
