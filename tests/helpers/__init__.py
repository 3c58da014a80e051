"""What the tests share: sources and broken files (`fixtures`), prepared folders of pattern images and training
inputs (`train`), tiny checkpoints and evaluation inputs (`evaluate`), JPEG bytes (`images`). Prepared folders are
written by the package's own `alexrepro.data.shards.writer.write_prepared_folder`."""
