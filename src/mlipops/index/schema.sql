-- mlipops coverage index: the one schema of data/index.duckdb (versioned with the code).
-- Units are ASE's: eV, Å, eV/Å, K.

CREATE TABLE datasets (
    dataset_id      VARCHAR PRIMARY KEY,   -- md5 of data/curated/accepted.extxyz (= its DVC hash)
    accepted_path   VARCHAR NOT NULL,
    n_accepted      INTEGER NOT NULL,
    n_quarantined   INTEGER NOT NULL,
    created_at      TIMESTAMP NOT NULL,
    mlipops_version VARCHAR NOT NULL
);

CREATE TABLE frames (
    frame_id          VARCHAR NOT NULL,   -- sha256 of species, positions, cell, pbc (1e-6 Å)
    dataset_id        VARCHAR NOT NULL REFERENCES datasets (dataset_id),
    status            VARCHAR NOT NULL CHECK (status IN ('accepted', 'quarantined')),
    split             VARCHAR,            -- train | val | test
    config_type       VARCHAR,
    source            VARCHAR,
    source_index      INTEGER,
    n_atoms           INTEGER,
    formula           VARCHAR,
    energy            DOUBLE,             -- eV, total
    energy_per_atom   DOUBLE,             -- eV/atom
    max_force         DOUBLE,             -- eV/Å, largest |F_i|
    volume_per_atom   DOUBLE,             -- Å^3/atom, NULL for non-periodic frames
    temperature_K     DOUBLE,
    periodic          BOOLEAN,
    quarantine_check  VARCHAR,
    quarantine_reason VARCHAR
);

CREATE TABLE atoms (
    frame_id      VARCHAR NOT NULL,
    atom_index    INTEGER NOT NULL,
    species       VARCHAR NOT NULL,
    coordination  INTEGER NOT NULL,       -- neighbours within index.coordination_cutoff
    nn_distance   DOUBLE,                 -- Å, nearest neighbour (NULL if none within the probe)
    PRIMARY KEY (frame_id, atom_index)
);

-- what the data covers, per split and config_type
CREATE VIEW coverage AS
SELECT split, config_type, status,
       count(*)                         AS n_frames,
       sum(n_atoms)                     AS n_atoms,
       min(energy_per_atom)             AS min_energy_per_atom,
       max(energy_per_atom)             AS max_energy_per_atom,
       min(volume_per_atom)             AS min_volume_per_atom,
       max(volume_per_atom)             AS max_volume_per_atom,
       max(max_force)                   AS max_force,
       min(temperature_K)               AS min_temperature_K,
       max(temperature_K)               AS max_temperature_K
FROM frames
GROUP BY split, config_type, status
ORDER BY split, config_type, status;
