"""The course: the closed-form demo behind chapter 1 and the JupyterLab launcher."""
