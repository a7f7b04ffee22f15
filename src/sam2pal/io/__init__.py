"""Reading and writing the project's files: images, video frames, masks, COCO, templates, atomic writes. Imports no torch."""
