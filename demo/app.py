"""Launch the DIFFA-2 Gradio audio Q&A demo: `python demo/app.py [--host H] [--port P] [--share] [--model DIR]`."""

from diffa2.demo.cli import main

if __name__ == "__main__":
    main()
