-- mlipops coverage index: the one schema of data/index.duckdb (versioned with the code).
-- Units are ASE's: eV, Å, eV/Å, K, degrees. The hull method is documented in src/mlipops/index/hull.py.

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
    bo_gap            DOUBLE,             -- eV, ΔE01 = E1 - E0 from an oracle with excited states; NULL if none
    n_atoms_outside_hull    INTEGER,      -- accepted frames: atoms with inside_hull = false
    max_extrapolation_grade DOUBLE,       -- accepted frames: largest γ of its atoms
    quarantine_check  VARCHAR,
    quarantine_reason VARCHAR
);

-- one row per atom of every accepted frame (split and config_type repeated from its frame, so
-- per-atom questions need no join)
CREATE TABLE atoms (
    frame_id             VARCHAR NOT NULL,
    atom_index           INTEGER NOT NULL,
    split                VARCHAR,
    config_type          VARCHAR,
    species              VARCHAR NOT NULL,
    coordination         INTEGER NOT NULL,  -- neighbours within index.coordination_cutoff
    nn_distance          DOUBLE,            -- Å, nearest neighbour (NULL if none within the descriptor cutoff)
    bond_angle_deviation DOUBLE,            -- degrees, W1 distance of the first-shell bond angles
                                            -- to those of nearest_crystal (NULL if < 2 neighbours)
    nearest_crystal      VARCHAR,           -- fcc | bcc | sc | diamond | hcp
    descriptor           FLOAT[],           -- the potential's atom-centred descriptor G
    projection           FLOAT[],           -- G standardized and projected on the hull's k PCs
    inside_hull          BOOLEAN NOT NULL,  -- inside the convex hull of the training atoms (same species)
    extrapolation_grade  DOUBLE NOT NULL,   -- γ: ≤ 1 inside, > 1 outside, inf if not representable
    hull_distance        DOUBLE,            -- distance to the hull in the projected space, 0 inside
    extrapolation_reason VARCHAR,           -- NULL inside | outside_hull | off_training_subspace | unseen_species
    PRIMARY KEY (frame_id, atom_index)
);

-- one row per species hull
CREATE TABLE hull (
    species                  VARCHAR PRIMARY KEY,
    method                   VARCHAR NOT NULL,   -- pca+lp: standardize, PCA to k, LP (HiGHS) on the extreme points
    k                        INTEGER NOT NULL,   -- number of principal components
    rank                     INTEGER NOT NULL,   -- dimension spanned by the projected training atoms (≤ k)
    n_train_atoms            INTEGER NOT NULL,
    n_extreme_points         INTEGER NOT NULL,
    explained_variance       DOUBLE NOT NULL,    -- share of the standardized descriptor variance kept by k PCs
    explained_variance_ratio DOUBLE[] NOT NULL,  -- per component
    training_split           VARCHAR NOT NULL,
    species_channels         VARCHAR[] NOT NULL, -- descriptor species order
    descriptor_settings      VARCHAR NOT NULL,   -- JSON of the descriptors params
    feature_mean             DOUBLE[] NOT NULL,
    feature_std              DOUBLE[] NOT NULL,
    components               DOUBLE[][] NOT NULL, -- [k][n_features]
    centroid                 DOUBLE[] NOT NULL    -- c of γ, in projected coordinates
);

CREATE TABLE hull_points (
    species     VARCHAR NOT NULL REFERENCES hull (species),
    point_index INTEGER NOT NULL,
    coords      DOUBLE[] NOT NULL,                -- an extreme point, projected coordinates
    PRIMARY KEY (species, point_index)
);

-- what the data covers, per split and config_type
CREATE VIEW coverage_by_config AS
WITH a AS (
    SELECT frame_id, count(*) FILTER (WHERE NOT inside_hull) AS n_out, max(extrapolation_grade) AS max_gamma
    FROM atoms GROUP BY frame_id
)
SELECT f.split, f.config_type, f.status,
       count(*)                          AS n_frames,
       CAST(sum(f.n_atoms) AS BIGINT)    AS n_atoms,
       min(f.energy_per_atom)            AS min_energy_per_atom,
       max(f.energy_per_atom)            AS max_energy_per_atom,
       min(f.volume_per_atom)            AS min_volume_per_atom,
       max(f.volume_per_atom)            AS max_volume_per_atom,
       max(f.max_force)                  AS max_force,
       min(f.temperature_K)              AS min_temperature_K,
       max(f.temperature_K)              AS max_temperature_K,
       CAST(sum(a.n_out) AS BIGINT)      AS n_atoms_outside_hull,
       round(sum(a.n_out) / sum(f.n_atoms) FILTER (WHERE a.frame_id IS NOT NULL), 4) AS fraction_outside_hull,
       max(a.max_gamma)                  AS max_extrapolation_grade
FROM frames f LEFT JOIN a ON a.frame_id = f.frame_id AND f.status = 'accepted'
GROUP BY f.split, f.config_type, f.status
ORDER BY f.split, f.config_type, f.status;

-- which local environments (species, coordination number) the accepted data holds, per split
CREATE VIEW coverage_by_species_coordination AS
SELECT species, coordination, split,
       count(*)                                  AS n_atoms,
       count(*) FILTER (WHERE NOT inside_hull)   AS n_outside_hull,
       round(avg(nn_distance), 4)                AS mean_nn_distance,
       round(avg(bond_angle_deviation), 3)       AS mean_bond_angle_deviation,
       round(median(extrapolation_grade), 4)     AS median_extrapolation_grade,
       max(extrapolation_grade)                  AS max_extrapolation_grade
FROM atoms
GROUP BY species, coordination, split
ORDER BY species, coordination, split;

-- frames with a temperature (MD snapshots), in 250 K bins
CREATE VIEW coverage_by_temperature AS
SELECT CAST(floor(temperature_K / 250) * 250 AS INTEGER) AS temperature_bin_K,
       split, config_type,
       count(*) AS n_frames, CAST(sum(n_atoms) AS BIGINT) AS n_atoms,
       min(temperature_K) AS min_temperature_K, max(temperature_K) AS max_temperature_K,
       CAST(sum(n_atoms_outside_hull) AS BIGINT) AS n_atoms_outside_hull
FROM frames
WHERE status = 'accepted' AND temperature_K IS NOT NULL
GROUP BY ALL
ORDER BY temperature_bin_K, split, config_type;

-- every atom outside the training hull, worst first
CREATE VIEW extrapolating_atoms AS
SELECT split, config_type, frame_id, atom_index, species, coordination,
       nn_distance, bond_angle_deviation, nearest_crystal,
       extrapolation_grade, hull_distance, extrapolation_reason
FROM atoms
WHERE NOT inside_hull
ORDER BY extrapolation_grade DESC, hull_distance DESC NULLS LAST, frame_id, atom_index;
