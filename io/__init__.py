"""hpc_train.io: parallel HDF5 (h5py on MPI-IO) and the fio-compatible I/O benchmark.

The reader, writer and benchmark land with the parallel-HDF5 issue; today this
package reports what the h5py installation can do.
"""

from __future__ import annotations


def h5py_status() -> dict:
    """h5py's version and whether it was built against parallel HDF5 (driver='mpio')."""
    try:
        import h5py
    except ImportError as exc:
        return {"h5py": None, "hdf5": None, "parallel": False, "error": str(exc)}
    return {
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "parallel": bool(h5py.get_config().mpi),
    }
