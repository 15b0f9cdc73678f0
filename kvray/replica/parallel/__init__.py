"""Tensor parallelism inside one engine: the process group and its collectives (``group``), the
rank processes that rank 0 starts and drives (``launcher``, ``worker``), how they live and die
(``lifecycle``), and which slice of each weight a rank holds (``sharding``). docs/parallel.md.

Import the modules themselves: this package's ``__init__`` stays empty of imports, so the
serving replica can use ``lifecycle`` without loading torch."""
