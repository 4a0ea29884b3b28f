"""A small ResNet on an image folder read from disk (torchvision's ImageFolder layout), decoded in DataLoader workers.

From the repository root::

    python examples/image_folder/make_images.py --out /tmp/shapes --per-class 300 && python -m launcher --gpus 2 --config-dir examples/image_folder/conf data.root=/tmp/shapes data.num_workers=2 trainer.channels_last=true

- ``conf/``: the project's own config directory (``--config-dir``) with its own groups ``model/resnet.yaml``
  and ``data/image_folder.yaml``
- ``model.py``: the network; ``data.py``: ``make_data(root, image_size, eval_fraction, split_seed)``
- ``make_images.py``: writes a tiny learnable folder (stripes one way, stripes the other, checkerboards)
"""  # noqa: E501 - the command is one line, to copy
