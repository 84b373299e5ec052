from robustbnn.cli import main

if __name__ == "__main__":  # the guard lets Dask start worker processes
    main()
