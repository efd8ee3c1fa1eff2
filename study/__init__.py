"""The comparison's and the probe's library: reports, statistics, sweeps, parallel workers, plots."""
