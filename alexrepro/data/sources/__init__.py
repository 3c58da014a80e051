"""Find the images of a dataset on disk and label them, whatever layout it came in.

`find_source(path)` (`registry`) recognises, in this order, one reader each (`archives`, `tree`):

- the official ILSVRC-2012 download: `ILSVRC2012_img_train.tar` (one inner `nXXXXXXXX.tar` per class),
  `ILSVRC2012_img_val.tar` (flat) and `ILSVRC2012_devkit_t12.tar.gz` (or its extracted folder); all three are
  needed. The archives are read in place: only member
  headers are read here, and each image becomes an (archive, offset, size) triple that a worker later reads with one
  seek and one read. Nothing is unpacked to disk or held in memory whole.
- the Kaggle layout: `ILSVRC/Data/CLS-LOC/{train,val}` with `LOC_synset_mapping.txt` and `LOC_val_solution.csv`
  at the top.
- an extracted tree: `train/<wnid>/…` with `val/<wnid>/…` (the valprep layout) or a flat `val/` labelled by the devkit
  (archive or extracted folder) or by Kaggle's `LOC_val_solution.csv`.
- an ImageFolder tree of one's own classes: `train/<class>/…`, optionally `val/<class>/…`.

Labels follow the Caffe/torchvision convention: the class index is the position of the WNID (or class folder name)
in sorted order. The devkit's ILSVRC2012_ID is kept beside it, because the ID order differs (ID 1 is n02119789,
sorted index 0 is n01440764). Files are recognised by content later, not by extension here: every regular file in a
class folder is an input (names starting with '.', such as `.DS_Store`, are not), so a file that is not an image ends
up in the rejected list instead of vanishing.

A new layout is one reader class (a module of its own, with `recognises(path)` and `read(path, options)`, as in
`base.SourceReader`) and one line in `registry.READERS`.
"""
