"""Tools: the ``cpusparse`` command and what it runs.

- :mod:`~cpusparse.tools.cli`: ``cpusparse train`` and the dispatch of the others;
- :mod:`~cpusparse.tools.bench`: ``cpusparse bench``;
- :mod:`~cpusparse.tools.trace`: ``cpusparse trace`` and ``cpusparse verify`` (golden
  traces);
- :mod:`~cpusparse.tools.datasets`: the offline data sets.

Modules here are imported by name; this package imports none of them eagerly.
"""
