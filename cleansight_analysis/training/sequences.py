"""Training sequences, re-exported from :mod:`cleansight_analysis.inputs.conversation`.

The encoder lives in the input layer because the logit lens (an intervention, below training) renders
conversations with it too; importing it from here keeps working.
"""

from ..inputs.conversation import IGNORE, ConversationEncoder, Encoded, collate

__all__ = ["IGNORE", "ConversationEncoder", "Encoded", "collate"]
