"""Qt-free core of the DecipherMR Slicer module.

Everything here takes the MRML scene (and nodes) as arguments and never touches ``slicer.mrmlScene``,
``qt`` or ``slicer.app``, so it runs and is tested on ``slicer-core`` without the application. Nothing
heavy is imported here: ``decipher_mr`` (and through it torch) is imported inside the functions that need
it, on an explicit user action.

>>> from DecipherMRLib import write_segmentation, write_heatmap, write_grounding
"""

from .Grounding import GroundingResult, jump_slice_views, peak_position, segment_name_for_query, write_grounding
from .HeatmapDisplay import (
    HEAT_COLOR_TABLE_NAME,
    heat_color_table,
    mask_to_segment,
    set_foreground_opacity,
    show_as_foreground,
    slice_composite_nodes,
    threshold_to_segment,
    write_heatmap,
)
from .RetrievalTables import RetrievalRow, excerpt_of, load_case, retrieval_row, write_retrieval_table
from .SceneTransaction import SceneTransaction
from .SegmentationWriter import (
    SegmentLabel,
    distinct_color,
    labels_from_rows,
    load_segmentation,
    new_segmentation_node,
    save_segmentation,
    segment_array,
    segmentation_logic,
    write_segmentation,
)
from .Signals import Signal
from .SubjectHierarchy import place_beside, sibling_parent
from .VolumeBridge import (
    add_volume_from_array,
    add_volume_from_decipher,
    array_from_volume_node,
    ijk_to_ras,
    load_volume_file,
    same_geometry,
    volume_from_node,
)
