"""Batch runs of a workflow over a folder of images, distributed by Ray (``python -m batch``, ``make batch``).

Retrace adds only the conversion (UI workflow -> API prompt, the image input filled per file, ``--set``
overrides) and the output bookkeeping (:mod:`batch.plan`: resumable, nothing overwritten, each image done once).
Scheduling, retries and scale-out are Ray's (:mod:`batch.driver` on the driver, :mod:`batch.worker` in the Ray
workers, each of which runs the real host headless). Ray is an optional extra (``requirements-batch.txt``);
nothing in the node pack imports this package.
"""
