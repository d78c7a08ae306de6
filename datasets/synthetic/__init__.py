"""Small generated datasets in the exact on-disk formats of the real ones, for the demo and the tests.

One module per format, each with ``make_<format>`` generators (``stanford_dogs.make_stanford_dogs``,
``folder.make_image_folder``, ``coco.make_coco_shapes``, ``celeba.make_celeba``, ``geotags.make_geotags``,
``faces.make_identity_folders`` / ``faces.make_lfw_pairs``, ``calibration.make_calibration_patterns``); what
they draw (backgrounds, gratings, shapes, colours, noise) lives in ``drawing``.
"""
