"""From UniProt to training-ready HDF5: ``protperf prepare-data`` and the dataset layout it writes.

Data flows one way, one module per step:

- :mod:`protperf.data.stream`: bytes from HTTP (resumed with Range requests) or local files,
  md5 metering, gunzip and tar members, each stage an iterator of chunks, prefetched in threads;
- :mod:`protperf.data.uniprot`: UniProt mirrors, release folders and ``RELEASE.metalink``;
- :mod:`protperf.data.sources`: one input (release archive, file, URL) -> decompressed bytes;
- :mod:`protperf.data.records`: chunks -> batches of records (accession, tokens, held-out flag)
  from UniProt flat files (a block scanner) or FASTA (Biopython);
- :mod:`protperf.data.build`: dedupe, split, concat chunks and the manifest (two passes over a spill);
- :mod:`protperf.data.h5`: the HDF5 split file layout (:class:`~protperf.data.h5.SplitWriter`,
  :func:`~protperf.data.h5.read_split`); :func:`protperf.data.build.write_split` makes tiny
  datasets in memory (tests, demos);
- :mod:`protperf.data.publish`: ``<out>.partial`` and the atomic rename; :mod:`protperf.data.paper`:
  the paper's defaults (held-out families, split fractions).
"""

from protperf.data.errors import ChecksumError, DataError, DownloadError, FormatError

__all__ = ["ChecksumError", "DataError", "DownloadError", "FormatError"]
