"""A trained model on new images: read it (`models`), list the images (`images`), run its task (`predictors`), pose
boxes (`boxes`), the Python API (`api`: `fastmae.predict`) and ONNX export (`export`)."""
