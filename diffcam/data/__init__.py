"""Datasets: :mod:`diffcam.data.shapes`, the procedural grounded world of the bundled model;
:mod:`diffcam.data.coco`, COCO-style datasets; :mod:`diffcam.data.grandf`, GranD-f grounded
captions; :class:`diffcam.data.sample.Sample`, the item a run consumes."""
