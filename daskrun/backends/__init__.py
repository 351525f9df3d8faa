"""Back ends: where inputs come from (``inputs``), where a job runs
(``compute``) and the storage beneath both (``storage``)."""
